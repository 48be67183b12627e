"""Pure pipeline: align -> parse -> regions -> attribute -> score. No Streamlit, no hidden state."""
