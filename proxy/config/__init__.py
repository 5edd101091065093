"""config.yaml: the model (model.py), how each part is read and checked
(checks.py, sections.py, policy.py) and loading a file (load.py).

Everything else imports from here; the submodules are the homes of new keys.
"""

from ..masking import mask_url
from ..routes import Route, RouteTable
from .checks import show
from .load import build, from_text, load, parse_yaml, read
from .model import (
    AdminConfig,
    ApiKey,
    ClientsConfig,
    Config,
    ConfigError,
    JwtConfig,
    LimitSet,
    Network,
    Penalty,
    ServerConfig,
    StorageConfig,
    Tier,
    UpstreamConfig,
    WhatifConfig,
    policy_item,
)
from .policy import hash_key

__all__ = [
    "AdminConfig",
    "ApiKey",
    "ClientsConfig",
    "Config",
    "ConfigError",
    "JwtConfig",
    "LimitSet",
    "Network",
    "Penalty",
    "Route",
    "RouteTable",
    "ServerConfig",
    "StorageConfig",
    "Tier",
    "UpstreamConfig",
    "WhatifConfig",
    "build",
    "from_text",
    "hash_key",
    "load",
    "mask_url",
    "parse_yaml",
    "policy_item",
    "read",
    "show",
]
