"""Our decoder inside other tools: diffusers pipelines (:mod:`ldm.integrations.diffusers_pipelines`)."""
