"""A context-free reference point for the LM: the perplexity of a unigram model on validation.

A language model that has learned anything beyond token frequencies must beat this number; one that
only matches it has learned the unigram distribution and nothing else.
"""

import math

import numpy as np

from lm.data import loader
from lm.data import tfds_builder
from lm.data import tokenizer as tokenizer_lib


def train_token_counts(data_dir: str, tokenizer: tokenizer_lib.Tokenizer) -> np.ndarray:
  """Returns int64 [vocab_size]: how often each id occurs in the train split, one EOS per document.

  These are the tokens the train loader scores (each document's ids followed by EOS; an instruction
  record's response, not its prompt).
  """
  counts_V = np.zeros(tokenizer.vocab_size, dtype=np.int64)
  source = tfds_builder.data_source(data_dir, "train")
  for i in range(len(source)):
    ids = tokenizer.encode(source[i]["text"].decode("utf-8"))
    ids.append(tokenizer.eos_id)
    counts_V += np.bincount(ids, minlength=tokenizer.vocab_size)
  return counts_V


def unigram_perplexity(data_dir: str, tokenizer: tokenizer_lib.Tokenizer, seq_len: int) -> float:
  """Returns the validation perplexity of an add-one smoothed unigram model fit on the train split.

  p(v) = (count_train(v) + 1) / (N_train + vocab_size). The perplexity exp(-mean log p) is taken
  over exactly the target positions `loader.eval_batches` produces for this `seq_len` with
  global_batch_size=1: every target of every full seq_len + 1 window of the packed validation
  stream (EOS included). A larger eval batch drops up to global_batch_size - 1 trailing windows,
  which moves this number by far less than its meaningful digits. Comparable to exp(validation
  loss) of the LM with the same tokenizer and seq_len. For instruction data only the scored
  (response) targets count, as in the LM's loss.
  """
  counts_V = train_token_counts(data_dir, tokenizer)
  log_p_V = np.log(counts_V + 1.0) - math.log(counts_V.sum() + tokenizer.vocab_size)
  total, num_targets = 0.0, 0
  for batch in loader.eval_batches(data_dir, tokenizer, seq_len=seq_len, global_batch_size=1):
    weights_BxL = batch.get("loss_weights", np.ones_like(batch["targets"]))
    total += float((log_p_V[batch["targets"]] * weights_BxL).sum())
    num_targets += int(weights_BxL.sum())
  if num_targets == 0:
    raise ValueError(f"seq_len={seq_len} is longer than the whole validation split; lower it.")
  return math.exp(-total / num_targets)
