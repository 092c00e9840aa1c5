"""nntrain: a small, hackable PyTorch training library that runs on its own Learner and on Lightning."""
