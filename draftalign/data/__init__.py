"""Data: row schemas, seed prompts, chat prompts, tokenizers, pretraining corpora, packing.

Layering (lowest first): errors, config <- util <- data <- models <- training <- evaluation
<- workers <- pipelines <- cli/api. Modules here may import draftalign.errors,
draftalign.config, draftalign.util and each other; not models, training, evaluation or
anything above. No re-exports: import from the module (`from draftalign.data.seeds import ...`).
"""
