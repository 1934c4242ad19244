"""The router: a small network that predicts, from the input alone, which expert to run."""
