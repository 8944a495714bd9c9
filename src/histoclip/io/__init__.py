"""Reading slides: AnnData in the scanpy/squidpy layout, SpatialData, image files."""

from ._image import ImageSource, MultiscaleImageSource, open_image
from ._slide import Slide, SpotData, resolve, set_fullres_image

__all__ = ["ImageSource", "MultiscaleImageSource", "open_image", "resolve", "set_fullres_image", "Slide", "SpotData"]
