"""The language model: a Llama-style decoder written once, with logical axis names and no device code."""
