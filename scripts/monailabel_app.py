"""MONAI Label app: the stock ``monaibundle`` app plus UnCoL's active-learning strategy.

``scripts/monailabel_server.py --strategy`` copies this file in as the app's ``main.py`` and the stock
app's ``main.py`` beside it as ``stock_main.py``. Every bundle the stock app serves keeps its
inference task; each also gets a ``<bundle>_uncertainty`` strategy
(:class:`custom.label_strategy.UnCoLUncertainty`, from the bundle's own ``custom/``), next to the
stock ``random`` and ``first``.
"""

import os
import sys

from monailabel.interfaces.app import MONAILabelApp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stock_main  # noqa: E402 - MONAI Label's monaibundle app, copied beside this file


# MONAI Label looks for a class naming MONAILabelApp among its direct bases, hence the explicit second base
class UnCoLApp(stock_main.MyApp, MONAILabelApp):
    def init_strategies(self):
        strategies = super().init_strategies()
        for name, path in self.models.items():
            if path not in sys.path:
                sys.path.insert(0, path)  # the bundle's custom/ package
            from custom.label_strategy import UnCoLUncertainty

            strategies[f"{name}_uncertainty"] = UnCoLUncertainty(path)
        return strategies
