"""Task metrics come from torchmetrics (see `mtlsparse.tasks`); sparsity metrics live here."""
