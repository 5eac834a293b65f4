"""What the command-line scripts share: devices, seeding, loading by flag (:mod:`ldm.cli.common`) and the batch
driver of the pair-inpainting scripts (:mod:`ldm.cli.pairs`)."""
