/*
 * What the CUDA driver sees from this process, for scripts/gpu-check.sh.
 *
 * libcuda is loaded with dlopen and the few entry points are declared here,
 * so this builds with a plain `cc` on a node without the CUDA toolkit.
 *
 * Output, one line each:
 *   count N
 *   device ORDINAL UUID PCI_BUS_ID      (UUID as nvidia-smi spells it)
 * Exit status: 0 when the driver answered (N may be 0), 2 when there is no
 * libcuda to load, 3 when the driver failed.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct {
    unsigned char bytes[16];
} CUuuid;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NO_DEVICE 100

typedef CUresult (*cu_init_fn)(unsigned int);
typedef CUresult (*cu_count_fn)(int *);
typedef CUresult (*cu_get_fn)(CUdevice *, int);
typedef CUresult (*cu_uuid_fn)(CUuuid *, CUdevice);
typedef CUresult (*cu_pci_fn)(char *, int, CUdevice);

static void *symbol(void *lib, const char *name)
{
    void *f = dlsym(lib, name);
    if (f == NULL)
        printf("error %s missing from libcuda\n", name);
    return f;
}

int main(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == NULL)
        lib = dlopen("libcuda.so", RTLD_NOW);
    if (lib == NULL) {
        printf("error no libcuda: %s\n", dlerror());
        return 2;
    }
    cu_init_fn init = (cu_init_fn)symbol(lib, "cuInit");
    cu_count_fn count = (cu_count_fn)symbol(lib, "cuDeviceGetCount");
    cu_get_fn get = (cu_get_fn)symbol(lib, "cuDeviceGet");
    cu_pci_fn pci = (cu_pci_fn)symbol(lib, "cuDeviceGetPCIBusId");
    /* The _v2 entry point exists since CUDA 11.4; the older one returns the same UUID for
     * a whole GPU. */
    cu_uuid_fn uuid = (cu_uuid_fn)dlsym(lib, "cuDeviceGetUuid_v2");
    if (uuid == NULL)
        uuid = (cu_uuid_fn)symbol(lib, "cuDeviceGetUuid");
    if (!init || !count || !get || !pci || !uuid)
        return 3;

    CUresult rc = init(0);
    if (rc == CUDA_ERROR_NO_DEVICE) {
        /* What CUDA_VISIBLE_DEVICES="" looks like to a process. */
        printf("count 0\n");
        return 0;
    }
    if (rc != CUDA_SUCCESS) {
        printf("error cuInit returned %d\n", rc);
        return 3;
    }
    int n = 0;
    if ((rc = count(&n)) != CUDA_SUCCESS) {
        printf("error cuDeviceGetCount returned %d\n", rc);
        return 3;
    }
    printf("count %d\n", n);
    for (int i = 0; i < n; i++) {
        CUdevice dev;
        CUuuid u;
        char bus[32];
        if ((rc = get(&dev, i)) != CUDA_SUCCESS || (rc = uuid(&u, dev)) != CUDA_SUCCESS ||
            (rc = pci(bus, (int)sizeof bus, dev)) != CUDA_SUCCESS) {
            printf("error device %d: driver returned %d\n", i, rc);
            return 3;
        }
        /* dlaunch writes PCI bus ids as dddd:bb:dd.f in lower case; drivers may give the
         * domain eight digits. */
        for (char *c = bus; *c; c++)
            if (*c >= 'A' && *c <= 'F')
                *c = (char)(*c - 'A' + 'a');
        size_t len = strlen(bus);
        const char *short_bus = len > 12 ? bus + len - 12 : bus;
        const unsigned char *b = u.bytes;
        printf("device %d GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x %s\n", i, b[0],
               b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15], short_bus);
    }
    return 0;
}
