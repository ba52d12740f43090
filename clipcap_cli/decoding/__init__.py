"""From a prefix to a caption: greedy, beam and sampled decoding, GPT-2 stepping, precision."""
