# data_npz_is_a_device.kt: a device never ends: refused before it is read
# expect: E604
graph data_npz_is_a_device
data npz { path = "/dev/zero" }
node a : cnn_tiny [target]
label -> a : through
