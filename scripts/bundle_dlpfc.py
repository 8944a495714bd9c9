"""Build the DLPFC 151673 file bundled in the package from the shared data folder.

Run from the repository root: python scripts/bundle_dlpfc.py ../shared/data/dlpfc/DLPFC_151673.h5ad
Gene symbols become var_names (Ensembl ids stay in var["gene_ids"]); counts, coordinates, the lowres image,
scale factors and the manual layers are kept unchanged.
"""

import sys

import anndata as ad

src = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/dlpfc/DLPFC_151673.h5ad"
a = ad.read_h5ad(src)
a.var_names = a.var["gene_symbol"].astype(str).to_numpy()
a.var = a.var[["gene_ids"]]
a.obs = a.obs[["in_tissue", "array_row", "array_col", "layer"]].copy()
a.obs["layer"] = a.obs["layer"].astype("category")
a.uns["spatial"]["151673"]["metadata"]["spot_diameter_um"] = 55.0
a.write_h5ad("src/histoclip/datasets/_data/dlpfc_151673.h5ad", compression="gzip")
print(a)
