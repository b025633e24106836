# OpenMP regions of the kernels, entered in one place (lmefast/_threads.pyx).
ctypedef void (*chunkfun)(void* ctx, int t) noexcept nogil

cdef bint may_use_threads(int nth) noexcept nogil
cdef void run_chunks(chunkfun fn, void* ctx, int nth) noexcept nogil
