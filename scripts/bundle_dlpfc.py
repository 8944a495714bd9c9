"""Build the DLPFC files bundled in the package (sections 151673 and 151674) from the shared data folder.

Run from the repository root: python scripts/bundle_dlpfc.py ../shared/data/dlpfc/DLPFC_151673.h5ad [more.h5ad]
Gene symbols become var_names (Ensembl ids stay in var["gene_ids"]); counts, coordinates, the lowres image,
scale factors and the manual layers are kept unchanged. Writes src/histoclip/datasets/_data/dlpfc_<id>.h5ad.
"""

import sys
from pathlib import Path

import anndata as ad

for src in sys.argv[1:] or ["../shared/data/dlpfc/DLPFC_151673.h5ad"]:
    section = Path(src).stem.split("_")[-1]
    a = ad.read_h5ad(src)
    a.var_names = a.var["gene_symbol"].astype(str).to_numpy()
    assert a.var_names.is_unique, f"{src}: gene symbols are not unique"
    a.var = a.var[["gene_ids"]]
    a.obs = a.obs[["in_tissue", "array_row", "array_col", "layer"]].copy()
    a.obs["layer"] = a.obs["layer"].astype("category")
    a.uns["spatial"][section]["metadata"]["spot_diameter_um"] = 65.0  # Space Ranger: spot_diameter_fullres spans 65 um
    a.write_h5ad(f"src/histoclip/datasets/_data/dlpfc_{section}.h5ad", compression="gzip")
    print(a)
