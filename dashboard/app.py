"""Streamlit entry point: ``streamlit run dashboard/app.py``. Pages only compose core calls."""
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` puts only dashboard/ on the path

from core.cli import quiet_library_warnings  # noqa: E402

quiet_library_warnings()
st.set_page_config(page_title="Face region explanations", page_icon="🧬", layout="wide")

pages = [
    st.Page("pages/explain.py", title="Explain a face", icon="🔍", default=True),
]
st.navigation(pages).run()
