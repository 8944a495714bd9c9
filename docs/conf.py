"""Sphinx configuration for histoclip."""

import os
from importlib.metadata import version as _version

project = "histoclip"
author = "histoclip developers"
copyright = "2026, histoclip developers"
release = _version("histoclip")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
nb_execution_mode = "off"  # tutorials are committed with their outputs and executed by the test suite
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
html_theme = "sphinx_book_theme"
html_title = "histoclip"
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]

# intersphinx needs the network; turn it on with HISTOCLIP_DOCS_INTERSPHINX=1 where there is one.
if os.environ.get("HISTOCLIP_DOCS_INTERSPHINX"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "python": ("https://docs.python.org/3", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "torch": ("https://pytorch.org/docs/stable/", None),
    }
nitpicky = False
templates_path = ["_templates"]


# --- files assembled from elsewhere in the repository ------------------------------------------------------------
# Tutorials live in ../tutorials (run by the test suite); benchmark results in ../benchmarks/results (written by the
# benchmark scripts). Copy them next to the pages that include them, only when their content changed.
def _sync(src, dst) -> None:
    import shutil
    from pathlib import Path

    src, dst = Path(src), Path(dst)
    if not dst.is_file() or dst.read_bytes() != src.read_bytes():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _assemble() -> None:
    from pathlib import Path

    here = Path(__file__).resolve().parent
    repo = here.parent
    for nb in sorted((repo / "tutorials").glob("*.ipynb")):
        _sync(nb, here / "tutorials" / nb.name)
    results = repo / "benchmarks" / "results"
    out = here / "_benchmarks"
    out.mkdir(exist_ok=True)
    for png in results.glob("*.png"):
        _sync(png, out / png.name)
    for name, script in (("prediction.md", "prediction.py"), ("domains.md", "domains.py"),
                         ("domains_slides.md", "domains_slides.py"),
                         ("domains_quadrants.md", "domains_slides.py q151673_0 q151673_1 q151673_2 q151673_3 "
                          "q151674_0 q151674_1 q151674_2 q151674_3 --out benchmarks/results/domains_quadrants"),
                         ("domains_pooled.md", "domains.py --pooled"),
                         ("domains_sensitivity.md", "domains.py --seeds --ablation-seeds --sensitivity-seeds 0 1 2"),
                         ("speed.md", "speed.py"),
                         ("compare_speed.md", "compare_speed.py"), ("her2st_morphology.md", "her2st_morphology.py"),
                         ("image_probe.md", "image_probe.py")):
        if (results / name).is_file():
            _sync(results / name, out / name)
        else:
            text = f"No results yet: run `python benchmarks/{script}` to write `benchmarks/results/{name}`.\n"
            if not (out / name).is_file() or (out / name).read_text() != text:
                (out / name).write_text(text)


_assemble()
exclude_patterns.append("_benchmarks")
