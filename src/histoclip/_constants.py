"""Every key histoclip reads or writes in an AnnData, in one place."""

from __future__ import annotations


class Key:
    """Names of the ``obs``/``obsm``/``uns``/``layers`` entries histoclip uses.

    Functions take a ``key_added`` argument to rename what they write; the defaults come from here.
    """

    class obsm:
        spatial = "spatial"
        joint = "X_histoclip"
        image = "X_histoclip_image"
        expression = "X_histoclip_expression"
        patch_box = "histoclip_patch_box"

    class obs:
        domain = "histoclip_domain"
        image_weight = "histoclip_image_weight"

    class uns:
        spatial = "spatial"
        histoclip = "histoclip"
        patches = "histoclip_patches"
        domain_genes = "histoclip_domain_genes"
        domain_shares = "histoclip_domain_shares"
        prediction = "histoclip_prediction"

    class layers:
        predicted = "histoclip_predicted"

    #: microns spanned by ``scalefactors["spot_diameter_fullres"]``, by technology. Space Ranger defines it as "the
    #: number of pixels that span the diameter of a theoretical 65 um spot" (Visium's spots are 55 um across, 100 um
    #: apart): with 55, DLPFC's spots came out 78 um apart instead of 100, and every micron setting was 28% off
    SPOT_DIAMETER_UM = {"visium": 65.0, "st": 100.0, "visium_hd": 2.0}
