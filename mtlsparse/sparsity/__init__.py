"""Sparsity methods and their building blocks (layers/groups, prox operators)."""
from mtlsparse.sparsity.base import Dense, SparsityMethod
from mtlsparse.sparsity.group_lasso import GroupLasso
from mtlsparse.sparsity.l1 import L1

__all__ = ["Dense", "GroupLasso", "L1", "SparsityMethod"]
