"""EdgeGLM."""
