def encode_topk(*a, **k): raise NotImplementedError
def decode_topk(*a, **k): raise NotImplementedError
