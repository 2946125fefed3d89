"""The update path's pure math: codecs (delta <-> wire tensors), accumulators (folding
updates as they arrive) and strategies (accumulated result -> next global weights)."""
