# setting_in_wrong_block.kt: `batch` is a train setting, written in the data block
# expect: E205
graph setting_in_wrong_block
data digits {
  val_split = 300
  batch = 64
}
node a : cnn_tiny [target]
label -> a : through
