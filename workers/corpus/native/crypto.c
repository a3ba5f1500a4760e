/* The libcrypto functions read.c and sink.c borrow (see native.h). */

#include <dlfcn.h>

#include "native.h"

/* sha256 from the libcrypto that Python's hashlib has loaded already (RTLD_NOLOAD: never a
 * second copy). None found: read_files returns no digests and the caller uses hashlib. */
digest_fn evp_digest;
const void *evp_sha256;
/* Incremental hashing, for Sink (EVP_MD_CTX is opaque: only pointers to it). */
void *(*ctx_new)(void);
void (*ctx_free)(void *);
int (*ctx_copy)(void *, const void *);
int (*digest_init)(void *, const void *, void *);
int (*digest_update)(void *, const void *, size_t);
int (*digest_final)(void *, unsigned char *, unsigned int *);

void find_crypto(void)
{
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.3.dylib", "libcrypto.so", NULL};
    for (int i = 0; names[i]; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_NOLOAD);
        if (!lib)
            continue;
        digest_fn digest = (digest_fn)dlsym(lib, "EVP_Digest");
        md_fn sha256 = (md_fn)dlsym(lib, "EVP_sha256");
        if (digest && sha256 && (evp_sha256 = sha256())) {
            evp_digest = digest;
            *(void **)&ctx_new = dlsym(lib, "EVP_MD_CTX_new");
            *(void **)&ctx_free = dlsym(lib, "EVP_MD_CTX_free");
            *(void **)&ctx_copy = dlsym(lib, "EVP_MD_CTX_copy_ex");
            *(void **)&digest_init = dlsym(lib, "EVP_DigestInit_ex");
            *(void **)&digest_update = dlsym(lib, "EVP_DigestUpdate");
            *(void **)&digest_final = dlsym(lib, "EVP_DigestFinal_ex");
            return;
        }
    }
}
