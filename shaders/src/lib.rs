//! Custom CubeCL kernels for cogview (they compile to WGSL, SPIR-V and MSL), each beside a
//! plain-burn reference and a parity test. None yet: the bf16 weight-unpacking kernel of the
//! memory work lands here.
