"""The uAPI of KVM's memory subsystem as pure functions: request in, errno or change out."""
