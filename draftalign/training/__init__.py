"""Training: distillation losses and batches, mixture sets, experiment tracking, training plots.

Layering (lowest first): errors, config <- util <- data <- models <- training <- evaluation
<- workers <- pipelines <- cli/api. Modules here may import draftalign.errors,
draftalign.config, draftalign.util, draftalign.data, draftalign.models and each other; not
evaluation or anything above. No re-exports: import from the module
(`from draftalign.training.losses import expected_acceptance`).
"""
