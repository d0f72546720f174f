"""Data pipeline: a corpus -> tfds array_record shards -> tokenizer -> grain batches.

The corpus is the bundled Shakespeare (corpus.py) or your own files (sources.py: text, JSONL,
Parquet; prepared once, recorded in manifest.py). Entry points: `loader.prepare` /
`loader.prepare_from_config` (run once before anything compiles), `loader.train_iterator`,
`loader.eval_batches`, `tokenizer.load_tokenizer` (which trains SentencePiece through
tokenizer_training.py when its model is not cached), `baseline.unigram_perplexity`. See docs/data.md.
"""
