"""Generic masked diffusion over the model protocol (disp_runner.models.base): the training
objective, decoding, batched inference and the training loop. Nothing here knows a model family."""
