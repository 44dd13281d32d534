"""valuemesh-sharing: the example third-party plugin of valuemesh (a local sharing economy).

The plugin itself is `valuemesh_sharing.plugin.PLUGIN`, registered under the `valuemesh.plugins` entry point.
"""

from __future__ import annotations

from .plugin import NAME, PLUGIN, Sharing

__all__ = ["NAME", "PLUGIN", "Sharing"]
