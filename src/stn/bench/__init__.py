"""`stn bench`: our training and data pipelines against the usual way of writing them, side by side."""
