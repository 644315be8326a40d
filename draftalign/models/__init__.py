"""Models: drafter architectures, GGUF import, model identity, export checks, cards, hub push.

Layering (lowest first): errors, config <- util <- data <- models <- training <- evaluation
<- workers <- pipelines <- cli/api. Modules here may import draftalign.errors,
draftalign.config, draftalign.util, draftalign.data and each other; not training, evaluation
or anything above. No re-exports, so torch and transformers load only when a module is
imported: `from draftalign.models.arch import build_config`.
"""
