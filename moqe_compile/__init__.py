"""moqe-compile: Mixture of Quantization Experts deployment compiler."""
__version__ = "0.1.0"
