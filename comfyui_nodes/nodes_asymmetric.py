"""The nodes. ComfyUI's modules are imported where they are used, so that the classes (their contracts) import
without ComfyUI; what the nodes compute is in ``ldm.integrations.comfyui`` (the project's ``ldm`` under a
private name, ``_project.py``)."""
from __future__ import annotations

from ._project import submodule

integration = submodule("integrations.comfyui")
LATENT_SPACES = submodule("latent_spaces").LATENT_SPACES

CATEGORY = "latent/asymmetric vae"
AUTO = "auto"


def _vae_folders():
    import folder_paths

    return folder_paths.get_folder_paths("vae")


class AsymmetricVAELoader:
    """A decoder file (the paper's .ckpt, our .safetensors, a diffusers folder, ASUKA's checkpoint) from ComfyUI's
    ``models/vae`` as a ``VAE`` that ComfyUI's own nodes take; its encoder is the frozen SD / FLUX.1 one."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        names = integration.vae_choices(folder_paths.get_filename_list("vae"), _vae_folders())
        return {"required": {
                    "vae_name": (names, {"tooltip": "a decoder checkpoint or diffusers folder in models/vae"}),
                    "latent_space": ([AUTO, *LATENT_SPACES], {
                        "default": AUTO,
                        "tooltip": "auto: read from the tensors (SD 1.x for 4 channels, FLUX.1 for ASUKA's decoder); "
                                   "name it for SDXL, SD 3.x or our FLUX.1 decoders"})},
                "optional": {
                    "config": ("STRING", {"default": "", "tooltip": "optional: one of the project's autoencoder "
                                          "YAMLs (path, or relative to the repository) instead of the tensors' own"})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an asymmetric decoder (paper's .ckpt, .safetensors, diffusers folder, ASUKA's) as a VAE."

    def load_vae(self, vae_name, latent_space=AUTO, config=""):
        from .vae import AsymmetricVAE

        path = integration.resolve_choice(vae_name, _vae_folders())
        return (AsymmetricVAE.from_file(path, config=config.strip() or None,
                                        latent_space=None if latent_space == AUTO else latent_space),)


class AsymmetricVAEDecode:
    """Decode with the image and the mask: the kept region (mask 0) follows ``pixels``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "the latent to decode"}),
            "vae": ("VAE", {"tooltip": "from AsymmetricVAELoader"}),
            "pixels": ("IMAGE", {"tooltip": "the image that was inpainted (its kept region guides the decoder)"}),
            "mask": ("MASK", {"tooltip": "1 = generated region, 0 = kept"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decodes a latent with the asymmetric decoder, reading the input image and mask."

    def decode(self, samples, vae, pixels, mask):
        return (_asymmetric(vae).decode_with_prior(samples["samples"], pixels, mask),)


class AsymmetricVAEDecodeTiled(AsymmetricVAEDecode):
    """:class:`AsymmetricVAEDecode` in overlapping tiles for large images; each tile reads its crop of the image
    and mask."""

    @classmethod
    def INPUT_TYPES(cls):
        inputs = super().INPUT_TYPES()
        inputs["required"].update(
            tile_size=("INT", {"default": 512, "min": 64, "max": 4096, "step": 32, "tooltip": "tile side, pixels"}),
            overlap=("INT", {"default": 64, "min": 0, "max": 4096, "step": 32, "tooltip": "overlap, pixels"}))
        return inputs

    DESCRIPTION = "Decodes a latent with the asymmetric decoder in tiles, reading the input image and mask."

    def decode(self, samples, vae, pixels, mask, tile_size=512, overlap=64):
        overlap = min(overlap, tile_size // 4)  # as ComfyUI's VAEDecodeTiled limits it
        return (_asymmetric(vae).decode_with_prior(samples["samples"], pixels, mask, tile_size=tile_size,
                                                   overlap=overlap),)


def _asymmetric(vae):
    if not hasattr(vae, "decode_with_prior"):
        raise ValueError(f"vae: this VAE ({type(vae).__name__}) cannot read an image and mask; load the "
                         "decoder with AsymmetricVAELoader")
    return vae


NODE_CLASS_MAPPINGS = {
    "AsymmetricVAELoader": AsymmetricVAELoader,
    "AsymmetricVAEDecode": AsymmetricVAEDecode,
    "AsymmetricVAEDecodeTiled": AsymmetricVAEDecodeTiled,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AsymmetricVAELoader": "Load Asymmetric VAE",
    "AsymmetricVAEDecode": "Asymmetric VAE Decode (image + mask)",
    "AsymmetricVAEDecodeTiled": "Asymmetric VAE Decode Tiled (image + mask)",
}
