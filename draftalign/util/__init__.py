"""Small helpers every layer uses: atomic file writes, secret redaction, run provenance.

Layering (lowest first): errors, config <- util <- data <- models <- training <- evaluation
<- workers <- pipelines <- cli/api. Modules here may import draftalign.errors,
draftalign.config and each other, nothing else of draftalign. No re-exports: import from the
module (`from draftalign.util.atomicio import write_text_atomic`).
"""
