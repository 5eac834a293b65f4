"""What a diffusers user types first, against the real pipelines (tiny random components, as
tests/integrations/test_pipelines.py builds them): ``pipe.vae = decoder`` fails before the denoiser runs, saying what
to call;
``inpaint`` returns the pipeline's own output type, takes lists of images and masks as the pipeline does, and refuses
non-finite values naming where they are."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.image_io import NonFiniteError
from ldm.integrations.diffusers_pipelines import inpaint
from tests.integrations.test_pipelines import (
    FAST,
    FLUX_,
    SD,
    H,
    W,
    build_flux,
    build_sd,
    export_vae,
    flux_prompt,
    inputs,
    make_decoder,
    sd_prompt,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd():
    """(SD 1.5 inpainting pipeline whose VAE holds the vanilla decoder's weights, vanilla, asymmetric decoder)."""
    vanilla = make_decoder(SD, condition=False)
    pipe = build_sd(export_vae(vanilla))
    pipe.set_progress_bar_config(disable=True)
    return pipe, vanilla, make_decoder(SD, condition=True, seed=1)


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


@pytest.mark.parametrize("build, space, prompt", [(build_sd, SD, sd_prompt), (build_flux, FLUX_, flux_prompt)],
                         ids=["sd15-inpaint", "flux-fill"])
def test_pipe_vae_assignment_fails_before_the_denoiser_saying_what_to_call(build, space, prompt):
    """StableDiffusionInpaintPipeline passes image and mask to vae.decode only for diffusers' own
    AsymmetricAutoencoderKL; FLUX.1 Fill never does. Our decoder as ``pipe.vae`` fails at the pipeline's first use
    of it, one line naming inpaint()."""
    pipe = build(export_vae(make_decoder(space, condition=False)))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    _denoiser(pipe).register_forward_hook(lambda *args: calls.append(1))
    pipe.vae = make_decoder(space, condition=True)
    image, mask = inputs()
    with pytest.raises(AttributeError) as error:
        pipe(image=image, mask_image=mask, height=H, width=W, **FAST, **prompt())
    message = str(error.value)
    assert "\n" not in message and "pipe.vae = decoder" in message
    assert "ldm.integrations.diffusers_pipelines.inpaint(pipe, decoder, image, mask_image" in message
    assert calls == []  # the denoiser never ran
    assert not hasattr(make_decoder(space, condition=True), "config")  # hasattr stays a plain False


def test_inpaint_returns_the_pipelines_own_output_type(sd):
    pipe, vanilla, asymmetric = sd
    image, mask = inputs()
    kw = dict(generator=torch.Generator().manual_seed(0), **FAST, **sd_prompt())
    theirs = pipe(image=image, mask_image=mask, height=H, width=W, output_type="np", **kw)
    for decoder in (None, vanilla, asymmetric):
        out = inpaint(pipe, decoder, image, mask, output_type="np", generator=torch.Generator().manual_seed(0),
                      **FAST, **sd_prompt())
        assert type(out) is type(theirs) is diffusers.pipelines.stable_diffusion.StableDiffusionPipelineOutput
        assert out.images.shape == (1, H, W, 3)
    # the vanilla decoder holds the pipeline VAE's weights: the same images as the pipeline's own output
    out = inpaint(pipe, vanilla, image, mask, output_type="np", **kw | {"generator": torch.Generator().manual_seed(0)})
    np.testing.assert_allclose(out.images, theirs.images, atol=1e-5)
    pil = inpaint(pipe, asymmetric, image, mask, generator=torch.Generator().manual_seed(0), **FAST, **sd_prompt())
    assert isinstance(pil.images[0], Image.Image) and pil.images[0].size == (W, H)


def test_inpaint_takes_lists_of_images_and_masks_as_the_pipeline_does(sd):
    """``[img, img], [mask, mask]`` (PIL, as the pipelines take lists) equals the batch of two."""
    pipe, _, asymmetric = sd
    (a, mask), (b, _) = inputs(0), inputs(1)
    pil = [Image.fromarray((x[0] * 255).round().astype(np.uint8)) for x in (a, b)]
    pil_mask = Image.fromarray((mask[0, ..., 0] * 255).astype(np.uint8))
    prompt = {k: v.repeat(2, 1, 1) for k, v in sd_prompt().items()}
    kw = dict(output_type="np", **FAST, **prompt)
    listed = inpaint(pipe, asymmetric, pil, [pil_mask, pil_mask], generator=torch.Generator().manual_seed(0), **kw)
    assert listed.images.shape == (2, H, W, 3)
    batched = inpaint(pipe, asymmetric, np.stack([np.asarray(p) for p in pil]).astype(np.float32) / 255,
                      np.concatenate([mask, mask]), generator=torch.Generator().manual_seed(0), **kw)
    np.testing.assert_allclose(listed.images, batched.images, atol=1e-5)
    assert np.abs(listed.images[0] - listed.images[1]).max() > 0.01  # each image decoded with its own prior


def test_non_finite_values_are_refused_naming_where_they_are(sd, monkeypatch):
    pipe, _, asymmetric = sd
    image, mask = inputs()
    kw = dict(output_type="np", **FAST, **sd_prompt())
    nan_image = image.copy()
    nan_image[0, 10, 12] = np.nan  # under the mask: the decoder never reads it, but the pipeline's encoder does
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(NonFiniteError, match=r"^image: 3 of 4608 values are NaN"):
        inpaint(pipe, asymmetric, nan_image, mask, **kw)
    nan_mask = mask.copy()
    nan_mask[0, 0, 0] = np.inf  # the pipeline's mask processor would binarise it to 1
    with pytest.raises(NonFiniteError, match=r"^mask_image\[1\]: 1 of"):
        inpaint(pipe, asymmetric, [image[0], image[0]], [mask[0], nan_mask[0]], **kw)
    assert calls == []  # refused before the pipeline ran
    hook.remove()
    # the pipeline's final latents (a float16 overflow, here a scheduler gone wrong)
    step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step", lambda *a, **k: (step(*a, **k)[0] * torch.inf,))
    with pytest.raises(NonFiniteError, match=r"^StableDiffusionInpaintPipeline's final latents: \d+ of \d+ values"):
        inpaint(pipe, asymmetric, image, mask, **kw)
