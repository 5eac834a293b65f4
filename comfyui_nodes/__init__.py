"""ComfyUI custom nodes for the asymmetric decoder (link or copy this folder into ``ComfyUI/custom_nodes/``; the
project must be installed into ComfyUI's Python: ``pip install -e <this repository>``). See docs/comfyui.md."""
from .nodes_asymmetric import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
