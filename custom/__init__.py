"""UnCoL-MONAI: the Python code that the bundle's configs wire together."""
