"""Loss balancers (see `Balancer` for the contract)."""
from mtlsparse.balancers.base import BalanceContext, Balancer
from mtlsparse.balancers.famo import FAMO
from mtlsparse.balancers.gradnorm import GradNorm
from mtlsparse.balancers.jd import JD
from mtlsparse.balancers.linear import Linear
from mtlsparse.balancers.uncertainty import Uncertainty

__all__ = ["FAMO", "JD", "BalanceContext", "Balancer", "GradNorm", "Linear", "Uncertainty"]
