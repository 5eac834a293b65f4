"""Checkpoint handling in three layers, each importing only the ones below it, under the models and
:mod:`ldm.loading` above them (``tests/test_layers.py``):

1. :mod:`ldm.checkpoints.files`: files -> tensors (``.ckpt`` read without running pickled code, ``.safetensors``,
   a diffusers folder's files), and writing them atomically;
2. :mod:`ldm.checkpoints.tensors`: what the tensors are (latent space, decoder variant, unused release keys,
   where a single-file checkpoint keeps its VAE);
3. :mod:`ldm.checkpoints.diffusers` and :mod:`ldm.checkpoints.keys`: key layouts (ours <-> diffusers), any format
   into our keys, the strict key check against a model;
and above the models, :mod:`ldm.loading`: config + checkpoint -> a model ready to use.
"""
