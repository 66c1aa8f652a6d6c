"""The operations under test, one module each: load, extract, counts, strip, convert, lora, quant."""
