"""Streamlit entry point: ``streamlit run dashboard/app.py``. Pages only compose core calls."""

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` puts only dashboard/ on the path

from core.library_warnings import quiet_library_warnings, warnings_without_data
from dashboard import hosting, render, resources, state

resources.keep_uploads_in_memory()  # before any upload can reach the server: nothing of a photo on disk
quiet_library_warnings()
warnings_without_data()  # a warning's text may name photos: the server log gets it at DEBUG only
st.set_page_config(page_title="Face region explanations", page_icon="🧬", layout="wide")
# Hosted mode: a signed-out visitor (or one without a role) sees the sign-in page and nothing else; the gate runs
# before st.navigation, so no page can forget it. Local mode: a no-op.
hosting.gate()

# Page files live in views/, not pages/: AppTest runs a page in a pages/ folder as its own script.
page = st.navigation(
    [
        st.Page("views/explain.py", title="Explain a face", icon=":material/face:", url_path="explain", default=True),
        st.Page("views/regions.py", title="Regions", icon=":material/crop_free:", url_path="regions"),
        st.Page("views/statistics.py", title="Statistics (RQ1)", icon=":material/bar_chart:", url_path="statistics"),
        st.Page("views/hpo.py", title="HPO correlation (RQ2)", icon=":material/biotech:", url_path="hpo"),
    ]
)
state.sidebar()
link_slot = st.sidebar.empty()
cache_slot = st.empty()  # above the page: a full or read-only cache disk is said once, the page still works
page.run()
state.link_hint(link_slot, page.url_path)
if (notice := resources.cache_notice()) is not None:
    cache_slot.warning(render.markdown_escape(notice), icon="💾")
