"""Loss balancers (see `Balancer` for the contract)."""
from mtlsparse.balancers.base import BalanceContext, Balancer
from mtlsparse.balancers.linear import Linear
from mtlsparse.balancers.uncertainty import Uncertainty

__all__ = ["BalanceContext", "Balancer", "Linear", "Uncertainty"]
