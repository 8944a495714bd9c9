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

    #: diameter of a spot in microns, by technology
    SPOT_DIAMETER_UM = {"visium": 55.0, "st": 100.0, "visium_hd": 2.0}
