"""Training losses; configs name ``ldm.modules.losses.LPIPSWithDiscriminator`` as the original did."""
from ...modules.losses.contperceptual import LPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator"]
