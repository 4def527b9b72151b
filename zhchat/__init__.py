"""zhchat: train and serve your own Chinese chat model on Ray.

`zhchat` holds what training and serving both need (config schema, dialogue format,
tokenizer loading, the generation engines in zhchat/engine/); `pipelines` holds the offline stages and `services` the
online Serve app.
"""

__version__ = "0.1.0"
