# data_npz_is_a_folder.kt: the data path names a folder, not an .npz file
# expect: E604
graph data_npz_is_a_folder
data npz { path = "." }
node a : cnn_tiny [target]
label -> a : through
