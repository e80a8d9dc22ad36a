"""lit_llm: train the GPT of "Build a Large Language Model (From Scratch)" with PyTorch Lightning."""
