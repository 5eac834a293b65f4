"""Training losses; configs name ``ldm.modules.losses.LPIPSWithDiscriminator`` as the original did."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator"]
