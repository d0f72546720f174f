"""Data pipeline: bundled corpus -> tfds array_record shards -> tokenizer -> grain batches.

Entry points: `loader.prepare` (run once before anything compiles), `loader.train_iterator`,
`loader.eval_batches`, `tokenizer.load_tokenizer`, `baseline.unigram_perplexity`. See docs/data.md.
"""
