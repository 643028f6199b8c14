"""The fast CPU path of the model: the convolution back-ends and the C++ kernels they run on.

`kernels` (with `kernels.cc`) builds and calls the C++ kernels, `convolution` chooses a
convolution back-end per layer, `ops` runs the layers' other array operations on the kernels
on the CPU and on XLA elsewhere. See README.md in this folder.
"""
